"""Resume and re-submission check the config (no Ray): a change to what defines a run is refused in
one line naming old and new values; logging/checkpoint intervals, workers and resources may change."""

from __future__ import annotations

import json

import pytest

from pipeline.config import RESUME_SAFE_KEYS, TrainConfig, check_resume_config, resolve, resume_changes
from pipeline.train.ray_job import check_resubmission, save_config


def cfg_dict(*sets: str) -> dict:
    return resolve("demo", list(sets)).to_dict()


def test_identity_changes_are_refused_and_safe_ones_allowed():
    saved = cfg_dict()
    assert resume_changes(saved, cfg_dict()) == ([], [])
    changed = cfg_dict("optim.lr_base=0.2", "schedule.global_batch=512", "aug.mixup_alpha=0")
    refused, allowed = resume_changes(saved, changed)
    assert refused == ["aug.mixup_alpha", "optim.lr_base", "schedule.global_batch"] and allowed == []
    refused, allowed = resume_changes(saved, cfg_dict("schedule.log_every=1", "schedule.ckpt_every=100",
                                                      "run.cpus_per_worker=4", "run.num_workers=4", "data.workers=3"))  # fmt: skip
    assert refused == [] and allowed == ["data.workers", "run.cpus_per_worker", "run.num_workers", "schedule.ckpt_every",
                                         "schedule.log_every"]  # fmt: skip
    # Mixed: both lists, sorted; the micro-batch and the seed define the run.
    refused, allowed = resume_changes(saved, cfg_dict("schedule.micro_batch=64", "run.seed=1", "schedule.eval_every=7"))
    assert refused == ["run.seed", "schedule.micro_batch"] and allowed == ["schedule.eval_every"]
    assert "schedule.micro_batch" not in RESUME_SAFE_KEYS and "run.precision" not in RESUME_SAFE_KEYS


def test_dict_fields_compare_whole_and_use_gpu_only_with_explicit_precision():
    refused, _ = resume_changes(cfg_dict(), cfg_dict('model.overrides={"drop_rate": 0.2}'))
    assert refused == ["model.overrides"]
    # precision=auto is fp32 on CPU and bf16 on GPU: moving the run changes its arithmetic.
    assert resume_changes(cfg_dict(), cfg_dict("run.use_gpu=true")) == (["run.use_gpu"], [])
    fp32 = cfg_dict("run.precision=fp32")
    assert resume_changes(fp32, cfg_dict("run.precision=fp32", "run.use_gpu=true")) == ([], ["run.use_gpu"])


def test_a_field_missing_from_an_old_config_counts_as_its_default():
    saved = cfg_dict()
    del saved["run"]["device_peak_flops"], saved["optim"]["sam_rho"]  # fields an older version did not have
    assert resume_changes(saved, cfg_dict()) == ([], [])
    assert resume_changes(saved, cfg_dict("optim.sam_rho=0.05")) == (["optim.sam_rho"], [])
    assert resume_changes(saved, cfg_dict("run.device_peak_flops=1e12")) == ([], ["run.device_peak_flops"])
    # A field the current config no longer has is a change too.
    saved["optim"]["gone"] = 1
    assert resume_changes(saved, cfg_dict()) == (["optim.gone"], [])
    # A saved config.json (floats and ints through JSON) equals the live config it came from.
    live = resolve("demo", ["schedule.epochs=3"]).to_dict()
    assert resume_changes(json.loads(json.dumps(live)), live) == ([], [])


def test_the_refusal_is_one_line_with_old_and_new_values():
    saved = cfg_dict()
    many = ["optim.lr_base=0.2", "schedule.global_batch=512", "aug.mixup_alpha=0", "aug.cutmix_alpha=0",
            "aug.hflip=false", "optim.momentum=0.8", "optim.nesterov=false", "run.seed=3", "schedule.log_every=1"]  # fmt: skip
    with pytest.raises(ValueError) as e:
        check_resume_config(saved, cfg_dict(*many), "runs/demo")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("run 'demo' at runs/demo was started with a different config: ")
    assert "aug.cutmix_alpha 1.0 -> 0.0" in msg and "(+2 more)" in msg and "Use a new run.name" in msg
    assert "schedule.log_every" not in msg  # allowed keys are not part of the refusal
    two = r"optim.lr_base 0.1 -> 0.2, schedule.global_batch 1024 -> 512; these define the run"
    with pytest.raises(ValueError, match=two):
        check_resume_config(saved, cfg_dict("optim.lr_base=0.2", "schedule.global_batch=512"), "runs/demo")
    assert check_resume_config(saved, cfg_dict("schedule.log_every=1"), "runs/demo") == ["schedule.log_every"]


def test_check_resubmission_on_a_run_directory(tmp_path, capsys):
    def cfg(*sets: str) -> TrainConfig:
        return resolve("demo", [f"run.storage={tmp_path}", "run.name=r", *sets])

    run = tmp_path / "r"
    assert check_resubmission(cfg("optim.lr_base=0.3")) == []  # no run directory yet
    save_config(cfg())
    assert check_resubmission(cfg("optim.lr_base=0.3")) == []  # config.json but no checkpoint: starts afresh
    (run / "checkpoint_2025-01-01_00-00-00.000000").mkdir()
    (run / "checkpoint_note.txt").write_text("a file, not a checkpoint dir")
    # a checkpoint directory Ray never registered (a crash mid-write): nothing would be resumed
    assert check_resubmission(cfg("optim.lr_base=0.3")) == []
    (run / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray registered a checkpoint
    refusal = r"run 'r' at .*/r was started with a different config: optim.lr_base 0.1 -> 0.3;"
    with pytest.raises(ValueError, match=refusal):
        check_resubmission(cfg("optim.lr_base=0.3"))
    with pytest.raises(ValueError, match="optim.lr_base"):  # save_config checks before it overwrites
        save_config(cfg("optim.lr_base=0.3"))
    assert json.loads((run / "config.json").read_text())["optim"]["lr_base"] == 0.1
    assert check_resubmission(cfg()) == []
    assert check_resubmission(cfg("schedule.log_every=50")) == ["schedule.log_every"]
    assert "schedule.log_every 5 -> 50" in capsys.readouterr().out
    # An evaluation under the run's name resumes nothing.
    assert check_resubmission(cfg("run.mode=eval", f"model.init_from={run}")) == []


def test_check_resubmission_on_s3(s3_server, s3_bucket):
    from data_prep.storage import Store

    def cfg(*sets: str) -> TrainConfig:
        where = [f"run.storage=s3://{s3_bucket}/runs", "run.name=r", f"data.s3_endpoint={s3_server}"]
        return resolve("demo", [*where, *sets])

    save_config(cfg())
    assert check_resubmission(cfg("aug.randaug_layers=0")) == []  # no checkpoint yet
    run = Store(f"s3://{s3_bucket}/runs/r", s3_server)
    run.write_bytes_atomic("checkpoint_manager_snapshot.json", b"{}")
    assert check_resubmission(cfg("aug.randaug_layers=0")) == []  # registered once, its directory gone
    run.write_bytes_atomic("checkpoint_000001/trainer.json", b"{}")
    with pytest.raises(ValueError, match=r"at s3://.*/runs/r .* aug.randaug_layers 2 -> 0;"):
        check_resubmission(cfg("aug.randaug_layers=0"))
    assert check_resubmission(cfg("data.workers=4")) == ["data.workers"]
