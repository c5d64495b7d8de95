"""The `lorafast-export` command line: flags → Recipe → library call. No logic of its own.

Exit codes: 0 success, 1 a validation gate failed, 2 bad input or usage, 3 internal error (a bug: please report).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import click
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lorafast_export.errors import (
    EXIT_BAD_INPUT,
    InputError,
    LorafastError,
    Terminated,
    io_error_as_input_error,
    received_signals,
)
from lorafast_export.recipe import CalibOptions
from lorafast_export.specs import HF_FORMATS, MERGE_DTYPES, QUANT_CHOICES, TARGET_NAMES

if TYPE_CHECKING:  # the pipeline (torch, transformers) is imported only by the commands that build
    from lorafast_export.pipeline import Built

console = Console(stderr=True)
out = Console()


def _raise_terminated(signum, frame) -> None:
    received_signals.append(signum)  # kept: publish() refuses even if this raise is swallowed somewhere
    raise Terminated(signum)


def install_signal_handlers() -> None:
    if threading.current_thread() is threading.main_thread():  # signal.signal works only there
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _raise_terminated)


class Ctx:
    def __init__(self, as_json: bool, quiet: bool, debug: bool):
        self.json, self.quiet, self.debug = as_json, quiet, debug

    def emit(self, data: dict, human) -> None:
        if self.json:
            click.echo(json.dumps(data, indent=2, default=str))
        elif not self.quiet:
            human()


def _fail(ctx: Ctx, e: LorafastError):
    if ctx.json:
        click.echo(json.dumps({"error": str(e), "exit_code": e.exit_code}))
    console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
    sys.exit(e.exit_code)


def _interrupted(e: KeyboardInterrupt):
    signum = getattr(e, "signum", signal.SIGINT)
    console.print(f"[red]interrupted[/] ({signal.Signals(signum).name}); nothing was published")
    sys.exit(128 + signum)


def _interrupt_behind(e: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C or SIGTERM / SIGHUP (Terminated) that e wraps, if any: Python 3.11 turns an exception raised in a
    class's __set_name__ into a RuntimeError caused by it, so a signal that arrives while a module defines its
    classes (an import: triton's knobs did it in a test) reaches us as that RuntimeError. It unwound as the signal
    did; it is reported as the signal, not as an internal error."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _run(ctx: Ctx, fn, *args, **kwargs):
    """Call the library; turn our errors into a message and an exit code (a traceback only with --debug)."""
    try:
        return fn(*args, **kwargs)
    except LorafastError as e:
        if ctx.debug:
            raise
        _fail(ctx, e)
    except KeyboardInterrupt as e:
        _interrupted(e)
    except Exception as e:  # a bug, not a user error, unless the machine refused a read or write (disk full)
        if (interrupt := _interrupt_behind(e)) is not None:
            _interrupted(interrupt)
        if ctx.debug:
            raise
        if (user_error := io_error_as_input_error(e)) is not None:
            _fail(ctx, user_error)
        console.print(
            f"[bold red]internal error:[/] {type(e).__name__}: {escape(str(e))}\n"
            "(re-run with --debug for the traceback)",
            highlight=False,
        )
        sys.exit(3)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress or summaries; errors only.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.version_option(package_name="lorafast-export")
@click.pass_context
def main(cctx: click.Context, as_json: bool, quiet: bool, debug: bool) -> None:
    """Compile a LoRA/DoRA fine-tuned LLM into a validated artifact for one runtime."""
    _passive_openmp()
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    cctx.obj = Ctx(as_json, quiet or as_json, debug)
    install_signal_handlers()
    _quiet_transformers()


def _passive_openmp() -> None:
    """OpenMP threads that wait for work sleep instead of spinning (unless OMP_WAIT_POLICY is already set).
    Read once, when torch loads its OpenMP runtime, which no command has done yet at this point. A spinning
    thread holds a core that onnxruntime (validation runs it between torch ops) or another process needs, and on
    a busy CPU each parallel op waits for threads that are not running: on a 2-core machine at load 5-7, merging
    one 13B MLP weight took 3-50 s with spinning threads and 0.7-1.2 s with sleeping ones (same values)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _progress(ctx: Ctx):
    """Stage-by-stage progress on stderr, silent under --quiet/--json: a rich status line on a terminal; one
    plain line per stage and sub-step with elapsed seconds otherwise (CI logs). A stage that reports
    "skipped ..." ends without a check mark."""
    if ctx.quiet:
        return None, (lambda stage, msg: None)
    if not console.is_terminal:
        return None, _line_progress()
    status = console.status("starting", spinner="dots")
    skipped: dict[str, str] = {}

    def update(stage: str, msg: str) -> None:
        if msg.startswith("skipped"):
            skipped[stage] = msg
        elif msg == "done":
            if stage in skipped:
                console.print(f"  [dim]- {stage} {escape(skipped.pop(stage))}[/]")
            else:
                console.print(f"  [green]✓[/] {stage}")
        else:
            status.update(f"[bold]{stage}[/] {'' if msg == 'start' else escape(msg)}")

    return status, update


def _line_progress():
    """update(stage, msg) printing '[  12.3 s] stage: msg' lines, and the stage's own time when it is done. Whole
    lines from any thread (validation reports from a worker thread on a CPU: validate/run.py Beside)."""
    t0 = time.perf_counter()
    started: dict[str, float] = {}
    skipped: set[str] = set()
    lock = threading.Lock()

    def update(stage: str, msg: str) -> None:
        with lock:
            _line(stage, msg)

    def _line(stage: str, msg: str) -> None:
        now = time.perf_counter()
        if msg == "start":
            started[stage] = now
            line = f"{stage} ..."
        elif msg == "done":
            took = now - started.pop(stage, now)
            line = f"{stage} done ({took:.1f} s)" if stage not in skipped else f"{stage} skipped"
        else:
            skipped.update([stage] if msg.startswith("skipped") else [])
            line = f"{stage}: {msg}"
        print(f"[{now - t0:7.1f} s] {line}", file=sys.stderr, flush=True)

    return update


class _DropRopeWarning(logging.Filter):
    # transformers warns on every llama3-rope config whose original_max_position_embeddings equals
    # max_position_embeddings, which is what Llama 3 ships (8192 and 8192); the model is right, the warning noise
    def filter(self, record: logging.LogRecord) -> bool:
        return "original_max_position_embeddings field must be less than" not in record.getMessage()


def _no_tqdm_bars() -> None:
    """Every tqdm bar in this process is disabled: compressed-tensors draws its own while transformers loads a
    compressed-tensors checkpoint, passing `disable=` explicitly (so TQDM_DISABLE cannot reach them). Our progress
    is rich's status line or the stamped CI lines; a library's bar would break both."""
    try:
        import tqdm.std  # not ours to declare: the libraries that draw the bars bring it
    except ImportError:
        return
    init = tqdm.std.tqdm.__init__
    if getattr(init, "lorafast_quiet", False):
        return

    def quiet_init(self, *args, **kwargs):
        kwargs["disable"] = True
        init(self, *args, **kwargs)

    quiet_init.lorafast_quiet = True
    tqdm.std.tqdm.__init__ = quiet_init


def _quiet_transformers() -> None:
    """No 'Loading weights' bars, no llama3 rope warning and no warning that peft 0.21 calls a deprecated
    transformers method (5.23+: `is_gradient_checkpointing`) from transformers in our output, and no tqdm bars
    from the libraries under it (compressed-tensors' "Applying quantization config", "Compressing model", ...
    when transformers loads a compressed-tensors checkpoint)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when transformers is first imported
    _no_tqdm_bars()
    warnings.filterwarnings(
        "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
    )
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    rope_log = logging.getLogger("transformers.modeling_rope_utils")
    if not any(isinstance(f, _DropRopeWarning) for f in rope_log.filters):
        rope_log.addFilter(_DropRopeWarning())


def _run_with_progress(ctx: Ctx, fn):
    """fn(update) under a status spinner (none under --quiet/--json)."""
    status, update = _progress(ctx)
    if status:
        status.start()
    try:
        return fn(update)
    finally:
        if status:
            status.stop()


# ---------------------------------------------------------------------------------------------- build


def _build_overrides(**o) -> dict:
    ov = {}
    if o["base"]:
        ov["inputs.base"] = o["base"]
        if not o["adapter"]:
            ov["inputs.adapters"] = []
    if o["adapter"]:
        from lorafast_export.adapters import parse_adapter_spec

        extra = {k: o[k] for k in ("lora_alpha", "use_rslora") if o.get(k) is not None}
        ov["inputs.adapters"] = [
            {"path": p, "weight": w, **extra} for p, w in map(parse_adapter_spec, o["adapter"])
        ]
    simple = {
        "target": "target.name",
        "quant": "quant.method",
        "bits": "quant.bits",
        "group_size": "quant.group_size",
        "hf_format": "target.hf_format",
        "dtype": "merge.dtype",
        "out": "output.dir",
        "max_tokens": "validate.max_tokens",
        "calib_samples": "quant.calib.samples",
        "calib_seq_len": "quant.calib.seq_len",
        "prompts": "validate.prompts",
        "junit": "validate.junit",
        "device": "quant.device",
        "name": "name",
    }
    for flag, key in simple.items():
        if o.get(flag) is not None:
            ov[key] = o[flag]
    for flag, key in (
        ("force", "output.force"),
        ("allow_pickle", "inputs.allow_pickle"),
        ("act_order", "quant.act_order"),
    ):
        if o.get(flag):
            ov[key] = True
    for flag in (
        "symmetric",
        "range_search",
        "scale_refit",
    ):  # tri-state: unset keeps the recipe's (or the method's) value
        if o.get(flag) is not None:
            ov[f"quant.{flag}"] = o[flag]
    for spec in o.get("target_option") or ():
        key, sep, value = spec.partition("=")
        if not sep:
            raise click.UsageError(f"--target-option {spec!r}: expected KEY=VALUE")
        ov[f"target.options.{key}"] = yaml.safe_load(value)
    if o.get("trt_llm_legacy"):
        ov["target.options.legacy"] = True
    for k in ("tp", "pp"):
        if o.get(k) is not None:
            ov[f"target.options.{k}"] = o[k]
    if o.get("no_cache"):
        ov["output.cache"] = False
    if o.get("no_validate"):
        ov["validate.enabled"] = False
    if o.get("calib"):
        ov["quant.calib.files"] = list(o["calib"])
    if o.get("gate"):
        ov["validate.gates"] = list(o["gate"])
    if o.get("eval"):
        ov["validate.eval"] = [_eval_spec(e) for e in o["eval"]]
    if o.get("out") and not o.get("name"):
        ov["name"] = Path(o["out"]).name
    return ov


def _eval_spec(s: str) -> dict:
    name, sep, path = s.partition("=")
    return {"name": name, "path": path} if sep else {"name": Path(s).stem, "path": s}


def load_recipe(recipe_path: str | None, overrides: dict):
    from lorafast_export.recipe import Recipe
    from lorafast_export.validate.gates import check_recipe_gates

    recipe = Recipe.load(recipe_path, overrides)
    check_recipe_gates(recipe)  # before any work, also with validation off
    return recipe


@main.command()
@click.option("--recipe", type=click.Path(dir_okay=False), help="YAML recipe; flags override its fields.")
@click.option(
    "--base",
    help="Base model directory (HF layout); required with --adapter (the demo base goes with demo:*).",
)
@click.option(
    "--adapter",
    multiple=True,
    help="PEFT adapter dir (or Lightning .ckpt), optionally PATH:WEIGHT. Repeatable.",
)
@click.option("--target", type=click.Choice(TARGET_NAMES), help="Where the artifact runs.")
@click.option("--quant", type=click.Choice(QUANT_CHOICES), help="Quantization method.")
@click.option("--bits", type=int)
@click.option("--group-size", type=int)
@click.option(
    "--act-order", is_flag=True, help="GPTQ: quantize columns in order of decreasing Hessian diagonal."
)
@click.option(
    "--symmetric/--asymmetric", default=None, help="Zero points or not (default per method and target)."
)
@click.option(
    "--range-search/--no-range-search",
    default=None,
    help="gptq / awq-gptq: search each group's range (Hessian-weighted error) instead of min-max (default: on at group size >= 128).",
)
@click.option(
    "--scale-refit/--no-scale-refit",
    default=None,
    help="gptq / awq-gptq: after the sweep, re-solve each group's scale for its codes (least squares on the calibration Hessian; default: on).",
)
@click.option("--calib", multiple=True, help="Calibration text/jsonl file(s). Default: bundled text.")
@click.option(
    "--calib-samples",
    type=int,
    help=f"Calibration windows (default {CalibOptions.model_fields['samples'].default}).",
)
@click.option(
    "--calib-seq-len",
    type=int,
    help=f"Tokens per calibration window (default {CalibOptions.model_fields['seq_len'].default}).",
)
@click.option(
    "--hf-format",
    type=click.Choice(HF_FORMATS),
    help="For --target hf with a quant method: checkpoint layout.",
)
@click.option(
    "--target-option",
    multiple=True,
    help="Target-specific KEY=VALUE (YAML value), e.g. aot=true. Repeatable.",
)
@click.option(
    "--trt-llm-legacy", is_flag=True, help="trt-llm: also/instead write the legacy engine checkpoint."
)
@click.option("--tp", type=int, help="trt-llm legacy: tensor-parallel size.")
@click.option("--pp", type=int, help="trt-llm legacy: pipeline-parallel size.")
@click.option("--dtype", type=click.Choice(MERGE_DTYPES), help="Merged weight dtype (auto: keep the base's).")
@click.option("--device", type=click.Choice(("auto", "cpu", "cuda")), help="Device for quantization.")
@click.option(
    "--eval", multiple=True, help="Eval set NAME=FILE (text or jsonl). Repeatable. Default: bundled."
)
@click.option("--gate", multiple=True, help='Validation gate, e.g. "kl_mean<=0.02". Repeatable.')
@click.option("--max-tokens", type=int, help="Eval token budget per eval set.")
@click.option(
    "--prompts", help="Prompts for greedy-generation checks (jsonl with 'prompt', or one per line)."
)
@click.option(
    "--junit",
    help="Write JUnit XML (one test case per gate) into the artifact, at this path relative "
    "to --out (e.g. junit.xml).",
)
@click.option("--no-validate", is_flag=True, help="Skip the validation stage.")
@click.option("--out", help="Output artifact directory.")
@click.option("--name", help="Artifact name (default: the --out directory's name).")
@click.option("--force", is_flag=True, help="Replace an existing artifact.")
@click.option("--no-cache", is_flag=True, help="Do not reuse (or store) finished stages in the stage cache.")
@click.option(
    "--allow-pickle", is_flag=True, help="Read .bin/.pt/.ckpt files (with torch.load weights_only=True)."
)
@click.option(
    "--lora-alpha", type=float, help="For Lightning .ckpt adapters whose hyperparameters lack alpha."
)
@click.option(
    "--use-rslora", is_flag=True, default=None, help="For Lightning .ckpt adapters: alpha/sqrt(r) scaling."
)
@click.option("--dump-recipe", is_flag=True, help="Print the resolved recipe as YAML and exit.")
@click.option(
    "--matrix",
    "matrix",
    multiple=True,
    help="Build every combination: --matrix target=a,b quant=c,d "
    "(axes: target, quant, bits, group_size, dtype, hf_format); artifacts go under --out.",
)
@click.argument("more_axes", nargs=-1)
@click.pass_obj
def build(ctx: Ctx, recipe, dump_recipe, matrix, more_axes, **flags):
    """Merge → quantize → lower → validate, into one artifact directory."""
    if more_axes and not matrix:
        raise click.UsageError(f"unexpected arguments {' '.join(more_axes)} (axes go after --matrix)")
    r = _run(ctx, load_recipe, recipe, _build_overrides(**flags))
    if dump_recipe:
        click.echo(r.to_yaml(), nl=False)
        return
    if matrix:
        return _build_matrix(ctx, r, [*matrix, *more_axes])
    from lorafast_export.pipeline import run_build

    built = _run_with_progress(ctx, lambda update: _run(ctx, run_build, r, update))
    _finish_build(ctx, built)


def _build_matrix(ctx: Ctx, r, specs: list[str]) -> None:
    from lorafast_export.errors import EXIT_GATE_FAILED
    from lorafast_export.matrix import parse_axes, run_matrix

    axes = _run(ctx, parse_axes, specs)
    summary = _run_with_progress(ctx, lambda update: _run(ctx, run_matrix, r, axes, update))
    from lorafast_export.matrix import render_summary

    ctx.emit(summary, lambda: out.print(render_summary(summary)))
    if any(row.get("error") for row in summary["artifacts"]):
        sys.exit(EXIT_BAD_INPUT)
    if not summary["passed"]:
        sys.exit(EXIT_GATE_FAILED)


def _finish_build(ctx: Ctx, built: Built) -> None:
    from lorafast_export.errors import EXIT_GATE_FAILED
    from lorafast_export.safeio import sha256_file

    summary = {
        "artifact": str(built.out_dir),
        "manifest_sha256": sha256_file(built.out_dir / "manifest.json"),
        "timings_s": built.timings,
        "facts": built.facts,
        "passed": None if built.report is None else built.report.get("passed"),
    }
    ctx.emit(summary, lambda: _print_build(built, summary["manifest_sha256"]))
    if built.report is not None and not built.report.get("passed", True):
        sys.exit(EXIT_GATE_FAILED)


def _print_build(built: Built, manifest_sha256: str) -> None:
    if built.report is not None and "markdown_table" in built.report:
        out.print(built.report["markdown_table"])
    verdict = (
        ""
        if built.report is None
        else ("  gates: [green]passed[/]" if built.report.get("passed") else "  gates: [red]FAILED[/]")
    )
    total = sum(built.timings.values())
    out.print(f"[bold green]built[/] {built.out_dir}  ({total:.1f} s){verdict}")
    out.print(f"  manifest sha256 {manifest_sha256} (check later: verify --expect)", highlight=False)


# ---------------------------------------------------------------------------------------------- validate


@main.command()
@click.option(
    "--artifact", required=True, type=click.Path(file_okay=False), help="A built artifact directory."
)
@click.option(
    "--eval", multiple=True, help="Eval set NAME=FILE (text or jsonl). Repeatable. Default: bundled."
)
@click.option("--gate", multiple=True, help='Gate, e.g. "kl_mean<=0.02" or "stage:artifact.top1>=0.95".')
@click.option(
    "--junit",
    help="Write JUnit XML (one test case per gate) into the artifact, at this path relative "
    "to --artifact (e.g. junit.xml).",
)
@click.option("--max-tokens", type=int, help="Eval token budget per eval set.")
@click.option("--prompts", help="Prompts for greedy checks (jsonl with 'prompt', or one per line).")
@click.pass_obj
def validate(ctx: Ctx, artifact, **flags):
    """Validate an artifact against the unmerged fine-tuned model; exit 1 if a gate fails."""
    from lorafast_export.errors import EXIT_GATE_FAILED
    from lorafast_export.report.markdown import render_markdown
    from lorafast_export.validate.run import summarize, validate_artifact

    ov = {
        k: v for k, v in _build_overrides(base=None, adapter=(), **flags).items() if k.startswith("validate.")
    }
    report = _run_with_progress(
        ctx, lambda update: _run(ctx, validate_artifact, Path(artifact), ov, lambda m: update("validate", m))
    )
    ctx.emit(summarize(report), lambda: out.print(render_markdown(report)))
    if not report.passed:
        sys.exit(EXIT_GATE_FAILED)


@main.group()
def report():
    """Work with report.json files."""


@report.command("diff")
@click.argument("a", type=click.Path())
@click.argument("b", type=click.Path())
@click.pass_obj
def report_diff(ctx: Ctx, a, b):
    """Two artifacts' reports side by side (A → B with deltas)."""
    from lorafast_export.report.diff import render_diff
    from lorafast_export.report.json_report import read_json

    def load(p):
        p = Path(p)
        return read_json(p / "report.json" if p.is_dir() else p)

    ra, rb = _run(ctx, load, a), _run(ctx, load, b)
    text = render_diff(ra, rb)
    ctx.emit({"diff": text}, lambda: click.echo(text))


# ---------------------------------------------------------------------------------------------- generate


def _draft_options(f):
    """--draft DIR and --speculative int4, the speculative options of generate, run and bench."""
    f = click.option(
        "--speculative",
        type=click.Choice(["int4"]),
        help="Speculative decoding with the artifact as its own draft, its linears quantized to int4 at load.",
    )(f)
    return click.option(
        "--draft", type=click.Path(file_okay=False), help="Speculative decoding: an artifact that drafts."
    )(f)


def _runtime_option(f):
    return click.option(
        "--runtime-option",
        "runtime_options",
        multiple=True,
        metavar="KEY=VALUE",
        help="A runtime option of the torch-compile runtime for this run only (as --target-option sets it at "
        "build), e.g. fused_decode=mma; repeatable.",
    )(f)


def _runtime_overrides(specs) -> dict:
    """--runtime-option KEY=VALUE ... -> RuntimeOptions overrides (values read as YAML: true, 4, mma)."""
    ov = {}
    for spec in specs or ():
        key, sep, value = spec.partition("=")
        if not sep or not key:
            raise click.UsageError(f"--runtime-option {spec!r}: expected KEY=VALUE, e.g. fused_decode=mma")
        ov[key] = yaml.safe_load(value)
    return ov


def _draft_of(artifact, draft, speculative) -> tuple[Path | None, bool]:
    """--draft DIR or --speculative int4 (the artifact as its own draft, its linears int4 at load) -> (the draft's
    artifact, whether its linears are quantized at load)."""
    if speculative is not None and draft is not None:
        raise click.UsageError("--draft and --speculative both name a draft: use one of them")
    if speculative == "int4":
        return Path(artifact), True
    return (None if draft is None else Path(draft)), False


@main.command()
@click.option(
    "--artifact", required=True, type=click.Path(file_okay=False), help="A built artifact directory."
)
@click.option("--input", "inp", required=True, type=click.Path(dir_okay=False), help='jsonl: {"prompt": ...}')
@click.option(
    "--output", required=True, type=click.Path(dir_okay=False), help="jsonl results (appended; resumable)"
)
@click.option("--max-new-tokens", default=128, show_default=True, type=int)
@click.option("--batch-size", default=16, show_default=True, type=int)
@click.option(
    "--device", default="cpu", show_default=True, help="cpu | cuda (as the artifact's runtime takes it)"
)
@_draft_options
@_runtime_option
@click.pass_obj
def generate(
    ctx: Ctx, artifact, inp, output, max_new_tokens, batch_size, device, draft, speculative, runtime_options
):
    """Greedy generation for every prompt of a file, through the artifact's runtime; resumes if interrupted."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from lorafast_export.generate import generate_file

    drafting = _draft_of(artifact, draft, speculative)

    bar = (
        None
        if ctx.quiet
        else Progress(
            "[bold]generate", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console
        )
    )
    task = bar.add_task("generate", total=None) if bar else None

    def progress(done, total):
        if bar:
            bar.update(task, completed=done, total=total)

    if bar:
        bar.start()
    try:
        res = _run(
            ctx,
            generate_file,
            Path(artifact),
            Path(inp),
            Path(output),
            max_new_tokens,
            batch_size,
            progress,
            *drafting,
            _runtime_overrides(runtime_options),
            device,
        )
    finally:
        if bar:
            bar.stop()
    ctx.emit(
        res,
        lambda: out.print(
            f"[green]wrote[/] {res['generated']} completions to {res['output']}"
            + (f" (resumed after {res['resumed_from']})" if res["resumed_from"] else "")
            + _generated_rate(res)
        ),
    )


def _generated_rate(res: dict) -> str:
    """', 1,234 tokens in 5.6 s (220.4 tok/s); speculation: 87.5% of 96 drafted tokens accepted in 24 rounds'."""
    text = f"; {res['new_tokens']:,} tokens in {res['seconds']:.1f} s"
    if res["tokens_per_s"]:
        text += f" ({res['tokens_per_s']:.1f} tok/s)"
    spec = res.get("speculation")
    if spec is not None:
        text += f"; speculation: {_pct(spec['acceptance'])} of {spec['drafted']} drafted tokens accepted in {spec['rounds']} rounds"
    return text


# ---------------------------------------------------------------------------------------------- run / bench


@main.command("run")
@click.option("--artifact", required=True, type=click.Path(file_okay=False), help="A torch-compile artifact.")
@click.option("--prompt", required=True)
@click.option("--max-new-tokens", default=64, show_default=True, type=int)
@click.option("--device", default="cpu", show_default=True, help="cpu | cuda")
@_draft_options
@_runtime_option
@click.pass_obj
def run_cmd(ctx: Ctx, artifact, prompt, max_new_tokens, device, draft, speculative, runtime_options):
    """Greedy generation for one prompt through our runtime (torch-compile target)."""
    import transformers

    from lorafast_export.runtime.api import model_dir_of, run_prompt

    d, self_int4 = _draft_of(artifact, draft, speculative)
    ov = _runtime_overrides(runtime_options)

    def go():
        model_dir = model_dir_of(artifact)
        tok = transformers.AutoTokenizer.from_pretrained(model_dir)
        ids = tok(prompt)["input_ids"]
        new = run_prompt(artifact, ids, max_new_tokens, device, d, draft_int4=self_int4, **ov)
        return {"prompt": prompt, "completion": tok.decode(new), "tokens": new}

    res = _run(ctx, go)
    ctx.emit(res, lambda: out.print(escape(prompt + res["completion"]), highlight=False))


@main.command("bench")
@click.option("--artifact", required=True, type=click.Path(file_okay=False), help="A torch-compile artifact.")
@click.option("--batch", default="1,8", show_default=True, help="Comma-separated batch sizes.")
@click.option("--prompt-len", default=128, show_default=True, type=int)
@click.option("--new-tokens", default=64, show_default=True, type=int)
@click.option("--device", default="cpu", show_default=True, help="cpu | cuda")
@_draft_options
@click.option(
    "--baseline/--no-baseline",
    default=True,
    show_default=True,
    help="With a draft: first the same benchmark without it (the artifact loaded alone), for the speed-up.",
)
@_runtime_option
@click.pass_obj
def bench_cmd(
    ctx: Ctx, artifact, batch, prompt_len, new_tokens, device, draft, speculative, baseline, runtime_options
):
    """Prefill/decode tokens/s, time to first token and peak memory per batch size (torch-compile target); with
    a draft, the acceptance rate and the speed-up over the artifact alone."""
    from lorafast_export.runtime.api import bench

    try:
        sizes = [int(b) for b in batch.split(",") if b]
    except ValueError:
        raise click.BadParameter(f"--batch {batch!r}: expected comma-separated integers") from None
    d, self_int4 = _draft_of(artifact, draft, speculative)
    ov = _runtime_overrides(runtime_options)
    res = _run(
        ctx,
        bench,
        artifact,
        sizes,
        prompt_len,
        new_tokens,
        device,
        d,
        baseline=baseline,
        draft_int4=self_int4,
        **ov,
    )
    ctx.emit(res, lambda: _show_bench(res))


def _num(v, fmt: str = ".1f") -> str:
    return "-" if v is None else format(v, fmt)


def _pct(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.1f}%"


def _show_bench(res: dict) -> None:
    """bench's rows as tables of what a reader compares (--json has every field): one row per batch size, and with
    a draft a second table of the speculation (acceptance, rounds, the speed-up over the artifact alone) and
    speculation auto's latest decision per batch size."""
    t = Table(title=f"bench {res['artifact']} ({res['device']}, {res['dtype']})")
    for h in ("batch", "tok/s", "decode tok/s", "ms/step", "prefill tok/s", "TTFT median ms", "peak GiB"):
        t.add_column(h, justify="right")
    for r in res["results"]:
        peak = r.get("peak_memory_bytes")
        t.add_row(
            str(r["batch"]),
            _num(r["tokens_per_s"]),
            _num(r["decode_tokens_per_s"]),
            _num(r["decode_step_ms"], ".2f"),
            _num(r["prefill_tokens_per_s"], ".0f"),
            _num(r["ttft_ms_median"]),
            _num(None if peak is None else peak / 2**30, ".2f"),
        )
    out.print(t)
    if "draft" not in res:
        return
    s = Table(title=f"speculation, draft {res['draft']}")
    for h in ("batch", "acceptance", "rounds", "decode tok/s", "alone", "speed-up"):
        s.add_column(h, justify="right")
    plain = res.get("plain") or [None] * len(res["results"])
    for r, alone in zip(res["results"], plain, strict=True):
        acc, x = r.get("spec_acceptance"), r.get("decode_speedup")
        s.add_row(
            str(r["batch"]),
            _pct(acc),
            str(r.get("spec_rounds", 0)),
            _num(r["decode_tokens_per_s"]),
            "-" if alone is None else _num(alone["decode_tokens_per_s"]),
            "-" if x is None else f"{x:.2f}x",
        )
    out.print(s)
    for r in res["results"]:  # speculation auto's latest decision for the row's batch bucket
        mine = [d for d in r.get("spec_decisions") or [] if d.get("bucket", 0) >= r["batch"]]
        if not mine:
            continue
        bucket = min(d["bucket"] for d in mine)
        last = [d for d in mine if d["bucket"] == bucket][-1]
        why = ", ".join(
            f"{k.replace('_', ' ')} {v}" for k, v in last.items() if k not in ("bucket", "decision", "from")
        )
        out.print(f"batch {r['batch']}: speculation {last['decision']} ({escape(why)})", highlight=False)


# ---------------------------------------------------------------------------------------------- verify


@main.command()
@click.argument("artifact", type=click.Path(file_okay=False))
@click.option(
    "--expect",
    metavar="SHA256",
    help="The manifest.json's sha256 as recorded elsewhere (the build prints it); a different one fails.",
)
@click.pass_obj
def verify(ctx: Ctx, artifact, expect):
    """Re-hash every file of an artifact against its manifest; exit 1 on any difference."""
    from lorafast_export.verify import verify_artifact

    res = _run(ctx, verify_artifact, Path(artifact), expect)

    def show():
        for kind in ("changed", "missing", "extra", "links"):
            for f in res[kind]:
                out.print(f"[red]{kind.removesuffix('s')}:[/] {escape(f)}")
        out.print(f"manifest sha256 {res['manifest_sha256']}", highlight=False)
        out.print(f"[green]verified[/] {res['files']} files" if res["ok"] else "[red]verification failed[/]")

    ctx.emit(res, show)
    if not res["ok"]:
        sys.exit(1)


# ---------------------------------------------------------------------------------------------- merge


@main.command("merge")
@click.option("--base", required=True, help="Base model directory.")
@click.option("--adapter", required=True, multiple=True, help="Adapter dir or .ckpt, optionally PATH:WEIGHT.")
@click.option("--out", required=True, help="Output directory for the merged HF checkpoint.")
@click.option(
    "--dtype", type=click.Choice(MERGE_DTYPES), default="auto", show_default=True, help="Merged weight dtype."
)
@click.option("--force", is_flag=True)
@click.option("--allow-pickle", is_flag=True)
@click.option(
    "--lora-alpha", type=float, help="For Lightning .ckpt adapters whose hyperparameters lack alpha."
)
@click.option("--use-rslora", is_flag=True, default=None, help="For Lightning .ckpt adapters.")
@click.pass_obj
def merge_cmd(ctx: Ctx, base, adapter, out, dtype, force, allow_pickle, lora_alpha, use_rslora):
    """Merge adapter(s) into the base exactly and write a Hugging Face checkpoint."""
    from lorafast_export.recipe import Recipe

    r = _run(
        ctx,
        Recipe().with_overrides,
        {
            **_build_overrides(
                base=base,
                adapter=adapter,
                out=out,
                force=force,
                allow_pickle=allow_pickle,
                dtype=dtype,
                lora_alpha=lora_alpha,
                use_rslora=use_rslora,
            ),
            "validate.enabled": False,
        },
    )
    from lorafast_export.pipeline import merge_only

    result = _run_with_progress(ctx, lambda update: _run(ctx, merge_only, r, update))
    ctx.emit(result, lambda: out_print_merge(result))


def out_print_merge(result: dict) -> None:
    for n in result["notes"]:
        out.print(f"[yellow]note:[/] {n}")
    out.print(f"[bold green]merged[/] into {result['out']}")


# ---------------------------------------------------------------------------------------------- inspect


@main.command()
@click.argument("path")
@click.option("--allow-pickle", is_flag=True)
@click.pass_obj
def inspect(ctx: Ctx, path, allow_pickle):
    """Describe an adapter (type, rank, alpha, targets, expected base) or a base model directory."""
    from lorafast_export.inspection import describe

    info = _run(ctx, describe, path, allow_pickle)
    ctx.emit(info, lambda: _print_kv(info))


def _print_kv(info: dict) -> None:
    t = Table(show_header=False, box=None)
    for k, v in info.items():
        t.add_row(f"[bold]{k}[/]", ", ".join(map(str, v)) if isinstance(v, list) else str(v))
    out.print(t)


# ---------------------------------------------------------------------------------------------- tune-kernels


def _model_config_path(model: Path) -> Path:
    """config.json of a model directory, or of a built artifact's model/ (a torch-compile artifact)."""
    for p in (model / "config.json", model / "model" / "config.json"):
        if p.is_file():
            return p
    raise InputError(
        f"{model}: no config.json here or in {model / 'model'}; pass a model directory or a torch-compile artifact."
    )


def _artifact_meta(model: Path) -> dict:
    """A torch-compile artifact's runtime.json ({} for any other model directory)."""
    for p in (model / "model" / "runtime.json", model / "runtime.json"):
        if p.is_file():
            try:
                meta = json.loads(p.read_text())
                meta.get("quant")
                return meta
            except (ValueError, AttributeError) as e:
                raise InputError(f"{p}: not a runtime.json ({e}); rebuild the artifact.") from e
    return {}


@main.command("tune-kernels")
@click.option(
    "--model",
    "model",
    required=True,
    type=click.Path(file_okay=False),
    help="A torch-compile artifact or any model directory (its config.json gives the linear shapes).",
)
@click.option(
    "--rows",
    default="1,8,32,2,4,16,64",
    show_default=True,
    help="Row buckets (decode batch sizes) to measure, most important first: --budget-s cuts the last.",
)
@click.option(
    "--budget-s", default=900.0, show_default=True, type=float, help="Stop measuring after this long."
)
@click.option(
    "--with-head",
    is_flag=True,
    help="Also the lm_head (automatic for an artifact built with quant.quantize_lm_head).",
)
@click.option(
    "--quick", is_flag=True, help="Two tiles per kernel instead of the whole grid (minutes, not tens)."
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Without a CUDA GPU: run the same code through Triton's interpreter (times mean nothing).",
)
@click.pass_obj
def tune_kernels(ctx: Ctx, model, rows, budget_s, with_head, quick, dry_run):
    """Measure the kernel tables for a model's shapes on this GPU (LORAFAST_CACHE/kernels/).

    The torch-compile runtime picks each int4 layer's kernel per batch size from a table measured on the GPU it
    runs on. Tables ship for the GPUs we measured; on any other GPU, or for other shapes, int4 layers fall back
    to our GEMM_W kernel with tiles by rule and unfused norms until this command measures them. An artifact with
    int8 weight-only layers, or with its lm_head stored int8 (target option lm_head), gets the int8 table too
    (1 and 32 rows, and 128 and 1,024 for prefills; --rows is int4's): without it those layers run dense bf16.
    The tables are read at the next load.
    """
    from lorafast_export.model.spec import ModelConfig

    try:
        buckets = [int(r) for r in rows.split(",")]
        if not buckets or min(buckets) < 1:
            raise ValueError
    except ValueError:
        _fail(ctx, InputError(f"--rows {rows!r}: give comma-separated row counts >= 1, e.g. 1,8,32."))
    cfg = _run(ctx, lambda: ModelConfig.from_file(_model_config_path(Path(model))))
    from lorafast_export.runtime.int4_table import layer_shapes

    dims = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    meta = _run(ctx, _artifact_meta, Path(model))
    quant = meta.get("quant") or {}
    with_head = with_head or (quant.get("bits") == 4 and bool(quant.get("quantize_lm_head")))
    int4 = not quant or quant.get("bits") == 4
    int8 = [] if int4 or quant.get("method") == "smoothquant" else layer_shapes(dims)  # int8 weight-only
    if (meta.get("options") or {}).get("lm_head") == "int8":
        int8.append((cfg.vocab_size, cfg.hidden_size))
    if not int4 and not int8:
        _fail(
            ctx,
            InputError(
                f"{model}: its layers are SmoothQuant W8A8, whose kernels are chosen by row count, not from a "
                "measured table, and its lm_head is not int8: nothing to measure."
            ),
        )
    import torch

    if not torch.cuda.is_available():
        if not dry_run:
            _fail(
                ctx,
                InputError(
                    "tune-kernels measures kernels on a CUDA GPU and none is visible here. Run it on the "
                    "machine that serves the model (--dry-run runs the code through Triton's interpreter)."
                ),
            )
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        _fail(
            ctx,
            InputError("tune-kernels needs triton (it comes with torch's CUDA wheels): pip install triton."),
        )
    from lorafast_export.runtime.kernel_tune import tune, tune_int8

    shown = not (ctx.quiet or ctx.json)  # the measurement's lines go to stderr, never into --json's stdout
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if shown else (lambda m: None)
    t0, res = time.perf_counter(), {}
    with contextlib.redirect_stdout(sys.stderr if shown else io.StringIO()):
        if int4:
            res = _run(
                ctx,
                tune,
                Path(model).name,
                dims,
                cfg.vocab_size if with_head else None,
                buckets,
                budget_s,
                quick,
                log,
            )
        if int8:
            left = budget_s - (time.perf_counter() - t0)
            res["int8"] = _run(ctx, tune_int8, int8, left, quick, log)

    def show():
        if int4:
            out.print(f"measured {res['measured_cells']} cells on {escape(res['gpu'])} in {res['seconds']} s")
            if res["skipped_by_budget"]:
                out.print(f"[yellow]not measured (--budget-s):[/] {', '.join(res['skipped_by_budget'])}")
            if res["fused_ops"]:
                out.print(f"fused decode ops: {', '.join(res['fused_ops'])}")
            out.print(
                f"table: {escape(res['table'])} (read when a runtime loads on this GPU)", highlight=False
            )
        if int8:
            r = res["int8"]
            out.print(
                f"int8: measured {r['measured_cells']} cells in {r['seconds']} s; int8 where it beat bf16 at "
                f"decode rows: {', '.join(r['in_int8']) or 'none (those layers run dense bf16)'}"
            )
            if r["skipped_by_budget"]:
                out.print(f"[yellow]not measured (--budget-s):[/] {', '.join(r['skipped_by_budget'])}")
            out.print(f"int8 table: {escape(r['table'])}", highlight=False)

    ctx.emit(res, show)


# ---------------------------------------------------------------------------------------------- doctor


@main.command()
@click.pass_obj
def doctor(ctx: Ctx):
    """Which targets and quantization methods work here, and how to get the rest."""
    from lorafast_export.inspection import environment_report

    rep = environment_report()
    ctx.emit(rep, lambda: _print_doctor(rep))


def _print_doctor(rep: dict) -> None:
    t = Table(title="targets")
    for col in ("target", "status", "how to get it"):
        t.add_column(col)
    for row in rep["targets"]:
        # hints hold brackets (pip install 'lorafast-export[onnxruntime]') that rich would read as markup
        t.add_row(row["name"], "[green]ready[/]" if row["ok"] else "[red]missing[/]", escape(row["hint"]))
    out.print(t)
    q = Table(title="quantization methods")
    q.add_column("method")
    q.add_column("status")
    for row in rep["quant_methods"]:
        q.add_row(row["name"], "[green]ready[/]" if row["ok"] else f"[red]{escape(row['hint'])}[/]")
    out.print(q)
    out.print(
        f"devices: {', '.join(rep['devices'])}   versions: "
        + ", ".join(f"{k} {v}" for k, v in rep["versions"].items())
    )
    if "int4_kernel_table" in rep:
        out.print(f"int4 kernel table: {escape(rep['int4_kernel_table'])}", highlight=False)


def run() -> None:  # pragma: no cover
    main(standalone_mode=True)


if __name__ == "__main__":  # pragma: no cover
    try:
        main()
    except SystemExit as e:
        sys.exit(e.code if e.code is not None else EXIT_BAD_INPUT)
