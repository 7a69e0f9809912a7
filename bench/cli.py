"""The skeleton every command shares: ``python -m bench <command> [options]``.

Every command takes --quick, --source, --output and --no-setup; this module parses them,
installs nginx/wrk when missing (bench/setup.sh), stops every started process on exit, error or
Ctrl-C, and writes the report (``<output>.md``) and its data (``<output>.json``). A command is a
module of this package with:

- ``TITLE``, ``OUTPUT`` (its default results name), ``TOOLS`` (the programs it needs);
- ``add_arguments(parser)``; ``QUICK``, the options --quick sets; ``LIMITS``, {option: (lowest,
  highest)}; optionally ``configure(parser, args)`` for what else must be checked;
- ``measure(args, procs, tmp) -> dict``: the report's data, with ``targets`` (``report.target``)
  when it has any and ``pass`` False to make the exit status 1;
- ``render(report) -> list[str]``: the lines between the common header and the targets.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import shlex
import subprocess
import sys
import tempfile

from bench import machine, report, services

COMMANDS = ("run", "streaming", "reliability", "soak", "scaleout", "hotpath", "hostile",
            "console", "targets", "compare")


def names(known):
    """An argparse ``type``: a comma-separated list of names from ``known``."""
    def parse(value: str) -> list[str]:
        chosen = [s.strip() for s in value.split(",") if s.strip()]
        unknown = [s for s in chosen if s not in known]
        if unknown or not chosen:
            problem = f"unknown {unknown[0]!r}" if unknown else "none given"
            raise argparse.ArgumentTypeError(f"{problem}; known: {', '.join(known)}")
        return chosen
    return parse


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m bench",
                                  description="The proxy's benchmarks (bench/README.md).")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"bench.{name}")
        p = sub.add_parser(name, help=module.__doc__.split("\n", 1)[0],
                           description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        quick = ", ".join(f"{_option(k)} {v:g}" for k, v in module.QUICK.items())
        p.add_argument("--quick", action="store_true", help=f"a shorter run: {quick}")
        p.add_argument("--source", default=services.REPO,
                       help="the proxy checkout to run (default: this one), e.g. a `git clone`")
        p.add_argument("--output", default=module.OUTPUT,
                       help=f"results: a name in bench/results (default {module.OUTPUT}) or a "
                            "path with a /; .md and .json are added")
        p.add_argument("--no-setup", dest="setup", action="store_false",
                       help="do not run bench/setup.sh when nginx, wrk or taskset is missing")
        p.set_defaults(module=module, parser=p)
    return top


def _configure(module, p, args) -> None:
    args.source = os.path.abspath(args.source)
    if not os.path.exists(os.path.join(args.source, "wsgi.py")):
        p.error(f"--source {args.source}: no wsgi.py there")
    args.output = services.output_path(args.output)
    if args.quick:
        vars(args).update(module.QUICK)
    if hasattr(module, "configure"):
        module.configure(p, args)
    for name, (lowest, highest) in module.LIMITS.items():
        if not lowest <= getattr(args, name) <= highest:
            p.error(f"{_option(name)} must be {lowest:,g} to {highest:,g}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    module, name = args.module, args.command
    _configure(module, args.parser, args)
    missing = services.missing_tools(module.TOOLS)
    if missing and args.setup:
        subprocess.run(["bash", os.path.join(services.BENCH, "setup.sh")], check=False)
        missing = services.missing_tools(module.TOOLS)
    if missing:
        print(f"bench {name}: missing {', '.join(missing)}: run bench/setup.sh (as root) first",
              file=sys.stderr)
        return 2
    services.interrupt_on_signals()
    data = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(["python -m bench", *map(shlex.quote, argv)]),
            "machine": machine.describe(), "source": machine.describe_source(args.source)}
    try:
        with tempfile.TemporaryDirectory(prefix=f"llm-proxy-bench-{name}-") as tmp, \
                services.ProcessSet() as procs:
            data.update(module.measure(args, procs, tmp))
    except KeyboardInterrupt:
        print(f"bench {name}: interrupted; every started process was stopped", file=sys.stderr)
        return 130
    lines = report.header(data, module.TITLE) + module.render(data)
    if data.get("targets"):
        lines += report.targets_table(data["targets"])
    text = "\n".join(lines) + "\n"
    print(text)
    services.write_results(args.output, text, data)
    ok = data.get("pass", True)
    print(f"bench {name}: {'PASS' if ok else 'FAIL'}; results in {args.output}.md and .json",
          file=sys.stderr)
    return 0 if ok else 1
