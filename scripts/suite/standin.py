#!/usr/bin/env python3
"""The "server binary" llama.cpp's server test suite starts (LLAMA_SERVER_BIN_PATH).

The suite asks for its own models from a hub, which cannot be reached here. This stand-in takes
the arguments the suite gives llama-server, replaces every model source (--hf-repo, --hf-file,
--model, --model-url, --model-draft, ...) by one local fixture GGUF, and becomes either stock
llama-server or `spark serve` in front of it (exec: the suite's SIGTERM reaches the server
itself). Both sides get the same mapped arguments, so a test that passes on one and fails on the
other shows a difference between the two servers, not between models.

Environment:
  SPARK_SUITE_SIDE          stock | spark
  SPARK_SUITE_MODEL         the fixture GGUF every model source is replaced by
  SPARK_SUITE_LLAMA_SERVER  the stock llama-server binary (stock side)
  SPARK_SUITE_SPARK         the spark binary (spark side)
  SPARK_SUITE_SPARK_ARGS    extra `spark serve` flags, split on whitespace (optional)
  SPARK_SUITE_DRY_RUN=1     print the command as JSON instead of running it (for tests)

A run without a model (the suite's router preset) also gets the fixture: spark serve wraps one
model, so the router mode is not compared.
"""

import json
import os
import sys

# Flags naming where a model comes from; each takes one value, and all of them are replaced by
# the fixture (the draft model of speculative decoding too).
MODEL_SOURCE = {
    "-m", "--model", "-mu", "--model-url", "-hf", "-hfr", "--hf-repo", "-hff", "--hf-file",
    "-dr", "--docker-repo",
}
DRAFT_SOURCE = {"-md", "--model-draft", "-hfd", "-hfrd", "--hf-repo-draft", "-hffd", "--hf-file-draft"}
# Flags with one value that are dropped: multimodal projectors cannot be fetched.
DROPPED_WITH_VALUE = {"-mmu", "--mmproj-url"}
# Flags without a value that are dropped: the fixture is local, there is nothing to fetch.
DROPPED = {"--offline"}
# Flags spark serve takes itself (spark listens where llama-server would have).
LISTEN = {"--host", "--port"}


class UsageError(Exception):
    pass


def map_args(args, side, model, llama_server, spark, spark_args=()):
    """The command (argv) that replaces `llama-server <args>` on `side`."""
    rest = []
    listen = {}
    draft = False
    i = 0
    while i < len(args):
        a = args[i]
        name, eq, inline = a.partition("=")
        takes_value = name in MODEL_SOURCE or name in DRAFT_SOURCE or name in DROPPED_WITH_VALUE or name in LISTEN
        if takes_value:
            if eq:
                value = inline
                i += 1
            else:
                if i + 1 >= len(args):
                    raise UsageError(f"{a} needs a value")
                value = args[i + 1]
                i += 2
            if name in DRAFT_SOURCE:
                draft = True
            elif name in LISTEN:
                listen[name] = value
            continue
        if a in DROPPED:
            i += 1
            continue
        rest.append(a)
        i += 1
    if draft:
        rest += ["--model-draft", model]
    if side == "stock":
        cmd = [llama_server, "--model", model]
        for flag in ("--host", "--port"):
            if flag in listen:
                cmd += [flag, listen[flag]]
        return cmd + rest
    if side == "spark":
        cmd = [spark, "serve", "--model", model]
        for flag in ("--host", "--port"):
            if flag in listen:
                cmd += [flag, listen[flag]]
        cmd += list(spark_args)
        return cmd + ["--"] + rest
    raise UsageError(f"SPARK_SUITE_SIDE={side!r}: expected stock or spark")


def main():
    env = os.environ
    try:
        side = env.get("SPARK_SUITE_SIDE", "")
        model = env.get("SPARK_SUITE_MODEL") or ""
        if not model:
            raise UsageError("SPARK_SUITE_MODEL is not set")
        cmd = map_args(
            sys.argv[1:],
            side,
            model,
            env.get("SPARK_SUITE_LLAMA_SERVER", "llama-server"),
            env.get("SPARK_SUITE_SPARK", "spark"),
            env.get("SPARK_SUITE_SPARK_ARGS", "").split(),
        )
    except UsageError as e:
        print(f"suite stand-in: {e}", file=sys.stderr)
        return 2
    if env.get("SPARK_SUITE_DRY_RUN") == "1":
        print(json.dumps(cmd))
        return 0
    sys.stdout.flush()
    run_env = dict(env)
    if side == "stock":
        # The cached engine's shared libraries sit beside bin/, as spark serve finds them.
        lib = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(cmd[0]))), "lib")
        if os.path.isdir(lib):
            old = run_env.get("LD_LIBRARY_PATH", "")
            run_env["LD_LIBRARY_PATH"] = f"{lib}:{old}" if old else lib
    os.execve(cmd[0], cmd, run_env)


if __name__ == "__main__":
    sys.exit(main())
