"""Child-process entry of a domain evaluation: runs lm_eval.simple_evaluate and writes its results as JSON.

Imports only the standard library and lm_eval, so it runs in any environment that has lm-eval (for the vllm
backend: one with lm-eval[vllm] on a GPU). Usage: python -m mergealign.evaluation.lm_eval_worker REQUEST.json
Exit code 3 = unknown task names (listed in the output file).
"""

import difflib
import json
import os
import sys


def _write(path, value):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=2, default=str)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def main(argv):
    with open(argv[0], encoding="utf-8") as handle:
        request = json.load(handle)
    import lm_eval
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=request["include_paths"] or None)
    known = set(manager.all_tasks)
    unknown = [t for t in request["tasks"] if t not in known]
    if unknown:
        suggestions = {t: difflib.get_close_matches(t, sorted(known), n=3) for t in unknown}
        _write(request["output"], {"error": "unknown_tasks", "unknown": unknown, "suggestions": suggestions})
        return 3
    seed = request["seed"]
    results = simple_evaluate(
        model=request["backend"],
        model_args=request["model_args"],
        tasks=request["tasks"],
        num_fewshot=request["num_fewshot"],
        batch_size=request["batch_size"],
        device=request["device"],
        limit=request["limit"],
        log_samples=False,
        apply_chat_template=request["apply_chat_template"],
        task_manager=manager,
        bootstrap_iters=request["bootstrap_iters"],
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    _write(
        request["output"],
        {
            "results": results["results"],
            "n_samples": results.get("n-samples", {}),
            "group_subtasks": results.get("group_subtasks", {}),
            "versions": results.get("versions", {}),
            "lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
