"""On-policy rounds in a job chain: the `[on_policy]` section of a job file (parsed by jobs/spec.py into
OnPolicySpec; `kdpipe status` reports the rounds through jobs/status.py; only jobs/plan.py builds them).

    [on_policy]
    rounds = 3                     # R >= 1
    samples_per_prompt = 2         # N completions per prompt per round
    temperature = 1.0              # the sampler's temperature
    steps_per_round = 200          # student optimizer steps per round
    start = "student-a"            # a [[students]] run trained off-policy first (round 0), or:
    # start_model = "models/sft"   # a given model (directory or hub id)
    evaluate_every_round = false   # with [evaluation]: evaluate after every round, not only the last
    prompts = { dataset = "prompts.jsonl", text_field = "text", id_field = "id" }   # like [data]
    train = { alpha = 0.0, lr = 1e-5, tokens_per_batch = 4096 }   # phase-two keys of every round
    generation = { max_new_tokens = 128 }   # phase-one keys over [generation] for the rounds

Round r (1..R), under RUN_DIR/onpolicy/round-r/:

    generate (array; recipe on-policy, sampler = round r−1's RUN/final, or the start model)
      --afterok--> finalize --afterok--> train (student = the same weights; fresh optimizer and
      schedule, steps_per_round) --afterok--> round r+1's generate ... --> evaluate (last round)

The teacher, engine and codec settings are the job's [teacher]/[generation] ones; only the
dataset (prompts), the recipe and the sampling settings change. Resubmission continues from
the last finished round: a round whose RUN/final holds this round's config is skipped with its
store; a finalized round store is reused only if it was sampled from the weights now in its
sampler's folder; a partial one resumes its missing tasks.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from kdpipe.jobs.spec import NOT_INHERITED, RunSpec, suggest
from kdpipe.storage.errors import ConfigError

@dataclasses.dataclass(frozen=True)
class RoundPlan:
    index: int  # 1..R
    store: Path
    run: Path  # the round's RUN (its final/ is the next round's sampler and student)
    model: str  # the weights this round samples from and starts training from
    state: str  # "done" | "to run" | "store reused" | "store partial"


def round_dir(job, r: int) -> Path:
    return job.run_dir / "onpolicy" / f"round-{r}"


def start_model(job, runs: list[RunSpec]) -> tuple[str, RunSpec | None]:
    """(the round-1 weights, the [[students]] run that produces them or None); refuses a missing start."""
    op = job.on_policy
    w = f"{job.path} [on_policy]"
    if op.start is not None:
        by_name = {r.name: r for r in runs}
        if op.start not in by_name:
            raise ConfigError(
                f"{w}.start: no [[students]] run named {op.start!r}{suggest(op.start, by_name)}; runs are "
                f"{', '.join(sorted(by_name))}. The start model must exist: a run of this job (trained off-policy first) "
                "or start_model = a model directory / hub id"
            )
        run = by_name[op.start]
        return str(job.run_dir / "runs" / run.name / "final"), run
    p = job.resolve_path(op.start_model)
    if p.exists():
        if not (p / "config.json").is_file() and not (p / "final" / "config.json").is_file():
            raise ConfigError(f"{w}.start_model: {p} holds no model (config.json) and no finished run (final/config.json)")
        return str(p / "final") if not (p / "config.json").is_file() else str(p), None
    looks_local = op.start_model.startswith((".", "/", "~")) or op.start_model.count("/") != 1
    if looks_local:
        raise ConfigError(
            f"{w}.start_model: {op.start_model!r} does not exist (resolved to {p}); the round chain starts from this model, "
            "so point start_model at an existing model directory (or a hub id such as org/name), or use start = a [[students]] run"
        )
    return op.start_model, None  # a hub id


def _gen_config(job, base_gen, sampler: str, store: Path):
    from kdpipe.pipeline.config import build_config, config_to_dict

    op = job.on_policy
    values = {k: v for k, v in config_to_dict(base_gen).items() if k not in NOT_INHERITED}
    values.update(op.generation)
    values.update(recipe="on-policy", sampler=sampler, samples_per_prompt=op.samples_per_prompt,
                  sampling_temperature=op.temperature, out=str(store))
    return build_config(type(base_gen), values, where=f"{job.path} [on_policy] (round generate)")


def _train_config(job, model: str, store: Path, run: Path):
    from kdpipe.jobs.phases import phase_class
    from kdpipe.pipeline.config import build_config

    op = job.on_policy
    values = dict(op.train)
    values.setdefault("alpha", 0.0)  # CE on the student's own samples would be self-imitation
    values.update(student=model, stores=(str(store),), out=str(run), steps=op.steps_per_round, resume=True)
    return build_config(phase_class("train"), values, where=f"{job.path} [on_policy].train")


def _sampled_from_other_weights(store: Path, sampler: str) -> str | None:
    """Why a finalized round store no longer matches its sampler's weights (None when it does / cannot tell)."""
    from kdpipe.pipeline.generate.teacher import local_model_revision
    from kdpipe.storage import open_store

    if not Path(sampler).is_dir():
        return None
    have = open_store(store).meta.recipe_params.get("sampler_revision")
    now = local_model_revision(Path(sampler))
    return None if have == now else f"sampled from weights {str(have)[:22]}…, but {sampler} now holds {now[:22]}…"


def round_steps(job, python: str, runs: list[RunSpec], steps: list, toml) -> tuple[list, list[str], list[RoundPlan]]:
    """The round chain's steps (appended after the off-policy ones), the skipped ones (why), and each round's state."""
    from kdpipe.jobs import phases
    from kdpipe.jobs.steps import Step, check_store, same_config

    op = job.on_policy
    cfgdir = job.run_dir / "configs"
    model, start_run = start_model(job, runs)
    names = {s.name for s in steps}
    prev_train = f"train-{start_run.name}" if start_run is not None and f"train-{start_run.name}" in names else None
    # The teacher/engine/codec settings of [teacher]/[generation], on the prompts dataset (none of
    # [data]'s keys carry over: the rounds read other text).
    base_gen = phases.generate_config(dataclasses.replace(job, data=dict(op.prompts)))
    gpus = op.gpus if job.slurm.gpus_per_node else 0
    out, skipped, rounds = [], [], []
    num_tasks = job.generation.num_tasks
    for r in range(1, op.rounds + 1):
        rd = round_dir(job, r)
        store, run = rd / "store", rd / "run"
        tag = f"onpolicy-r{r}"
        gen = _gen_config(job, base_gen, model, store)
        tr = _train_config(job, model, store, run)
        note = (f"# on-policy round {r}/{op.rounds}: student = {model} (the {'start model' if r == 1 else f'round {r - 1} final weights'}),\n"
                "# a fresh AdamW state and learning-rate schedule (only the weights carry over between rounds)\n")
        train_text = note + toml(tr)
        run_spec = RunSpec(name=tag, student=start_run.student if start_run else 0, nodes=op.nodes, gpus=gpus,
                           procs_per_node=max(gpus, 1), values={}, swept={"round": r})
        from kdpipe.pipeline.train.config import LOSS_AUTO  # resolved by the trainer on its device
        done = same_config(run / "final" / "train_config.toml", train_text, ignore={"resume"}, resolved_at_run=LOSS_AUTO)
        after_prev = (prev_train,) if prev_train else ()
        if done:
            skipped.append(f"{tag}-train: {run / 'final'} exists with the same config (round {r} done)")
            rounds.append(RoundPlan(r, store, run, model, "done"))
            prev_train = None
        else:
            st = check_store(store, num_tasks, None)
            why = _sampled_from_other_weights(store, model) if st.status == "finalized" else None
            if why:
                raise ConfigError(f"on-policy round {r}: the finalized store {store} was {why}; delete {rd} to redo the round")
            missing = tuple(i for i in range(num_tasks) if i not in st.done_tasks) if st.status != "finalized" else ()
            if st.status != "finalized":
                if missing:
                    out.append(Step(kind="generate", name=f"{tag}-generate",
                                    argv=tuple(phases.generate_argv(python, cfgdir / f"{tag}-generate.toml")),
                                    after=after_prev, tasks=missing, gpus=job.teacher.tensor_parallel_size if job.slurm.gpus_per_node else 0,
                                    config=cfgdir / f"{tag}-generate.toml", config_text=toml(gen)))
                out.append(Step(kind="finalize", name=f"{tag}-finalize",
                                argv=tuple(phases.finalize_argv(python, store, num_tasks)),
                                after=(f"{tag}-generate",) if missing else after_prev))
                after_train = (f"{tag}-finalize",)
            else:
                skipped.append(f"{tag}-generate + finalize: {store} is finalized (sampled from {model})")
                after_train = after_prev
            out.append(Step(kind="train", name=f"{tag}-train", argv=tuple(phases.train_argv(python, cfgdir / f"{tag}-train.toml")),
                            after=after_train, nodes=op.nodes, gpus=gpus, procs=max(gpus, 1),
                            config=cfgdir / f"{tag}-train.toml", config_text=train_text, run=run_spec))
            state = "store reused" if st.status == "finalized" else ("store partial" if st.status == "partial" else "to run")
            rounds.append(RoundPlan(r, store, run, model, state))
            prev_train = f"{tag}-train"
        if job.evaluation is not None and (r == op.rounds or op.evaluate_every_round):
            # The report records the round's store (an on-policy-only job has no off-policy store).
            ev = phases.eval_config(job, run_spec, run)
            # The report names the round's student by the round (its folder is "run", as in every round).
            names = ev.names or tuple(tag if i == 1 else n for i, n in enumerate(ev.model_names()))
            ev = dataclasses.replace(ev, stores=(str(store),), names=names)
            ev_text = toml(ev)
            if done and (run / "eval" / "report.json").is_file() and same_config(run / "eval" / "eval_config.toml", ev_text):
                skipped.append(f"{tag}-evaluate: {run / 'eval' / 'report.json'} exists with the same config")
            else:
                out.append(Step(kind="evaluate", name=f"{tag}-evaluate", argv=tuple(phases.eval_argv(python, cfgdir / f"{tag}-evaluate.toml")),
                                after=(f"{tag}-train",) if not done else (), gpus=phases_eval_gpus(job, ev),
                                config=cfgdir / f"{tag}-evaluate.toml", config_text=ev_text, run=run_spec))
        model = str(run / "final")
    return out, skipped, rounds


def phases_eval_gpus(job, ev) -> int:
    from kdpipe.jobs.steps import eval_gpus

    return eval_gpus(job, ev)


def describe_rounds(plan) -> list[str]:
    """The round chain as `kdpipe check` prints it."""
    if not plan.rounds:
        return []
    op = plan.job.on_policy
    lines = [f"on-policy rounds: {op.rounds} x ({op.samples_per_prompt} samples/prompt at temperature {op.temperature}, "
             f"{op.steps_per_round} steps), prompts {op.prompts.get('dataset') or op.prompts.get('data')}"]
    for rp in plan.rounds:
        lines.append(f"  round {rp.index}: {rp.state:<13} sampler/student {rp.model}")
        lines.append(f"           generate -> {rp.store} -> finalize -> train -> {rp.run / 'final'}")
    return lines


def rounds_doc(plan) -> list[dict[str, Any]]:
    """The rounds as submission.json / run.json record them (kdpipe status reads this)."""
    return [{"round": rp.index, "store": str(rp.store), "run": str(rp.run), "model": rp.model, "state_at_start": rp.state,
             "num_tasks": plan.job.generation.num_tasks} for rp in plan.rounds]
