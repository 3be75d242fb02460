"""Kennel's local runtime: runs a SageMaker pipeline definition JSON on this machine.

No AWS, no Docker, no network: the very definition `kennel definition` prints is interpreted
here, its jobs run as child processes with the container contract re-rooted in job folders, and
every piece of state is a plain file under the home folder (`.kennel/` or $KENNEL_HOME).

Modules (each testable alone; stdlib plus optuna and psutil; torch only inside jobs):

    home          where the state lives (resolve_home) and its layout
    files         atomic writes, JSON, tarballs, hashes
    store         the object store: s3://bucket/key <-> <home>/s3/bucket/key (ObjectStore,
                  import_objects for the code bundles the SDK uploaded)
    parameters    the definition's Parameters: defaults, typed overrides, one clear error
    expressions   Get / Std:Join / Std:JsonGet resolution and conditions, as pure functions
    graph         step dependencies (DependsOn, property references, branches); ordering
    state         executions and step records on disk, in SageMaker's words; list/load
    handlers      the step-handler interface (step type -> handler.run(step, arguments,
                  context) -> StepResult) and the steps not yet supported locally
    jobs/         container (child processes, /opt/ml re-rooting, metrics, hyperparameters),
                  processing, training, tuning (Random, Bayesian via optuna, Grid; early stopping)
    retry         RetryPolicies: what is retried, when, how often
    cache         CacheConfig: cache keys (arguments + code content), entries, ISO 8601 expiry
    runner        the scheduling loop: run_pipeline, resume
    progress      live display on a terminal, plain lines otherwise; format_execution
    cli           `python -m local run|resume|status`

Public entry points: local.runner.run_pipeline / resume / RunOptions / USER_ERRORS,
local.state.list_executions / load_execution, local.store.import_objects / ObjectStore,
local.progress.make_progress / format_execution, local.handlers.default_handlers.
"""
