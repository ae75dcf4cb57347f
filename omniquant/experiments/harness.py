"""The report's harness phase: one harness run per model against its OpenAI-compatible endpoint.

Policy:
- Pre-flight (``check_harness``) before any model work: the harness is installed and
  knows every task (its own task list, with the shipped ``tasks/lm-eval-demo`` folder
  included for lm-eval).
- A served model (URL) is used as it is; a local checkpoint is served by
  ``omniquant serve`` (``omniquant.endpoint.launch.launched_server``) for the duration of
  its run and stopped after, and its directory is the harness's tokenizer.
- A local checkpoint's server may read media under the task folder's parent
  (``--allowed-local-media-path``), where a task sends ``file://`` URLs.
- Output per model under ``OUT/harness/<name>/`` (the harness's samples, its sqlite cache,
  its log, the server's log). A run that fails raises with model, tasks and log path;
  the report is written only after every run, so no finished-looking ``report.json``
  exists for a failed one; ``OUT/harness/failed.json`` names the model, the tasks and the
  log folder. Runs whose tasks are not comparable are refused.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from pathlib import Path

from omniquant.data.shipped import shipped_dir
from omniquant.endpoint.harness import HarnessRun, check_comparable, get_harness
from omniquant.errors import EndpointError


def default_include(name: str) -> Path | None:
    """The shipped task folder of a harness (``tasks/lm-eval-demo``), if it exists."""
    folder = shipped_dir("tasks") / f"{name}-demo"
    return folder if folder.is_dir() else None


def check_harness(name: str, tasks: list[str], include: Path | None,
                  python: str | None = None) -> Path | None:  # fmt: skip
    """Refuse a missing harness or unknown tasks; return the include folder used.

    ``python`` is the harness's own interpreter (``--harness-python``), else the entry's
    environment variable, else this one."""
    if not tasks:
        raise EndpointError("name at least one task.", arg="harness_tasks")
    harness = get_harness(name)
    include = include or default_include(name)
    harness.check_tasks(tasks, include, python)
    return include


def _model_id(url: str, given: str | None) -> str:
    if given:
        return given
    import httpx

    try:
        data = httpx.get(url.rstrip("/") + "/models", timeout=30).json()["data"]
        return data[0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as err:
        raise EndpointError(
            f"{url}/models did not name a model ({err}); use URL#MODEL_ID."
        ) from err


def _media_args(include: Path | None) -> list[str]:
    """A local checkpoint's server may read media files under the task folder's parent
    (``tasks/``: the lmms-eval demo sends its video and audio as ``file://`` URLs of
    ``tasks/omni-demo``), as vLLM's ``--allowed-local-media-path``."""
    return ["--allowed-local-media-path", str(include.resolve().parent)] if include else []


def _write_failure(out: Path, model: str, tasks: list[str], model_out: Path, err) -> None:
    """``OUT/harness/failed.json``: which model and tasks failed, and where the logs are."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    record = {"model": model, "tasks": tasks, "logs": str(model_out), "error": str(err)}
    (out / "failed.json").write_text(json.dumps(record, indent=2) + "\n")


def run_harness(name: str, tasks: list[str], sources: list, names: list[str], out: Path, *,
                include: Path | None, harness_args: str | None = None,
                python: str | None = None,
                log: Callable[[str], None] | None = None) -> list[HarnessRun]:  # fmt: skip
    """Run the harness on every model (baseline first) and check the runs are comparable.

    Args:
        name: Registry name (``lm-eval``, ``lmms-eval``).
        tasks: Harness task names.
        sources: ``ModelSource`` s (``omniquant.endpoint.protocol``), baseline first.
        names: The models' names in the report, same order.
        out: Folder for the runs (``OUT/harness``).
        include: Extra task folder (``--include_path``).
        harness_args: Extra command-line arguments for the harness (shell-quoted).
        python: The harness's own interpreter (``--harness-python``; default: the
            entry's environment variable, else this interpreter).
        log: Receives progress lines.
    """
    from omniquant.endpoint.launch import launched_server

    harness = get_harness(name)
    extra = shlex.split(harness_args or "")
    say = log or (lambda _m: None)
    tokenizer = next((str(Path(s.path).resolve()) for s in sources if s.path is not None), None)
    runs = []
    for source, model_name in zip(sources, names, strict=True):
        model_out = out / model_name
        say(f"{name}: {model_name} on {', '.join(tasks)}")
        try:
            if source.url is not None:
                run = harness.run(url=source.url, model_id=_model_id(source.url, source.model),
                                  tokenizer=tokenizer, tasks=tasks, include=include, out=model_out,
                                  extra_args=extra, python=python)  # fmt: skip
            else:
                with launched_server(source.path, model_name, model_out / "serve.log",
                                     serve_args=_media_args(include)) as url:  # fmt: skip
                    run = harness.run(url=url, model_id=model_name, tokenizer=str(Path(source.path).resolve()),
                                      tasks=tasks, include=include, out=model_out,
                                      extra_args=extra, python=python)  # fmt: skip
        except EndpointError as err:
            _write_failure(out, model_name, tasks, model_out, err)
            raise
        run.model = model_name
        runs.append(run)
    check_comparable(runs)
    return runs
